# Finds ratd's third-party dependencies and makes imported targets:
#   PkgConfig::ZMQ  PkgConfig::PROTOBUFC  PkgConfig::HWLOC  PkgConfig::CMOCKA  PkgConfig::MHD
#   ra::faiss_c (FAISS C API + FAISS + BLAS + OpenMP)  ra::blas (OpenBLAS cblas)
# and the protoc-c executable PROTOC_C. The FAISS C API is taken from the system when
# a libfaiss_c exists there (conda, FAISS built with FAISS_ENABLE_C_API=ON), else from
# the build-local prefix .deps/faiss_c that scripts/deps compiles from Debian's source.
find_package(PkgConfig REQUIRED)
pkg_check_modules(ZMQ REQUIRED IMPORTED_TARGET libzmq)
pkg_check_modules(PROTOBUFC REQUIRED IMPORTED_TARGET libprotobuf-c)
pkg_check_modules(HWLOC REQUIRED IMPORTED_TARGET hwloc)
pkg_check_modules(CMOCKA IMPORTED_TARGET cmocka)
# libmicrohttpd: the daemon's Prometheus endpoint (--metrics)
pkg_check_modules(MHD REQUIRED IMPORTED_TARGET libmicrohttpd)
find_program(PROTOC_C NAMES protoc-c protoc-gen-c REQUIRED)
find_package(Threads REQUIRED)
find_package(OpenMP REQUIRED)

find_package(faiss CONFIG REQUIRED)
find_library(RA_FAISS_C_LIB NAMES faiss_c
             HINTS ${CMAKE_SOURCE_DIR}/.deps/faiss_c/lib)
if(NOT RA_FAISS_C_LIB)
  message(FATAL_ERROR "libfaiss_c not found: run scripts/deps (it builds the FAISS C API into .deps/faiss_c)")
endif()
message(STATUS "FAISS C API: ${RA_FAISS_C_LIB}")
find_path(RA_FAISS_C_INCLUDE faiss/c_api/faiss_c.h REQUIRED)
add_library(ra_faiss_c INTERFACE)
target_link_libraries(ra_faiss_c INTERFACE ${RA_FAISS_C_LIB} faiss OpenMP::OpenMP_CXX stdc++ m)
target_include_directories(ra_faiss_c INTERFACE ${RA_FAISS_C_INCLUDE})
add_library(ra::faiss_c ALIAS ra_faiss_c)

# OpenBLAS cblas for the reference decoder
find_path(RA_CBLAS_INCLUDE cblas.h PATH_SUFFIXES openblas openblas-pthread REQUIRED)
find_library(RA_OPENBLAS_LIB NAMES openblas REQUIRED
             PATH_SUFFIXES openblas-pthread)
add_library(ra_blas INTERFACE)
target_link_libraries(ra_blas INTERFACE ${RA_OPENBLAS_LIB})
target_include_directories(ra_blas INTERFACE ${RA_CBLAS_INCLUDE})
add_library(ra::blas ALIAS ra_blas)

# CUDA (gpu/ only)
set(RA_HAVE_CUDA OFF)
if(NOT RA_CUDA STREQUAL "OFF")
  include(CheckLanguage)
  if(NOT CMAKE_CUDA_COMPILER AND EXISTS /usr/local/cuda/bin/nvcc)
    set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc)
  endif()
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(CMAKE_CUDA_ARCHITECTURES ${RA_CUDA_ARCHS})
    enable_language(CUDA)
    find_package(CUDAToolkit REQUIRED)
    set(RA_HAVE_CUDA ON)
  elseif(RA_CUDA STREQUAL "ON")
    message(FATAL_ERROR "RA_CUDA=ON but no CUDA compiler was found")
  endif()
endif()
message(STATUS "ratd: CUDA backend ${RA_HAVE_CUDA}")
