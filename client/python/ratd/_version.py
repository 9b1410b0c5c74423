# The project version (CMakeLists.txt, project(ratd VERSION ...)); CMake refuses to
# configure when the two differ, so a release changes both.
__version__ = "0.1.0"
