"""Package list for the layout in pyproject.toml: root folders mapped under the r1pipe namespace."""
from setuptools import find_packages, setup

MAPPED = {"model": "r1pipe.model", "rewards": "r1pipe.rewards", "recipes": "r1pipe.recipes"}


def packages() -> list[str]:
    found = find_packages(include=["r1pipe", "r1pipe.*"])
    for folder, name in MAPPED.items():
        found.append(name)
        found += [f"{name}.{sub}" for sub in find_packages(where=folder)]
    return found


setup(packages=packages())
