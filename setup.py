"""Shim so that `python setup.py develop` and old pips work; the metadata lives in pyproject.toml."""
from setuptools import setup

setup()
