from setuptools import setup

setup(cffi_modules=["cdefs/build_ffi.py:ffibuilder"])
