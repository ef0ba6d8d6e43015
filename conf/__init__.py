# Makes conf/ the package fmnist_tl.conf (pyproject.toml maps it there), which Hydra reads as
# pkg://fmnist_tl.conf. An editable install finds a mapped package only through its __init__.py:
# setuptools' editable finder looks for that file, so without it `pip install -e .` could not
# import fmnist_tl.conf. The group folders below hold only YAML and need none.
