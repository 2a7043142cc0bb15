"""Shim so that older pip versions can install from setup.cfg."""
import setuptools

setuptools.setup()
