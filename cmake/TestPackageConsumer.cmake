# Builds and runs tests/consumer against stunet in the two ways a user would:
#   1. install:          cmake --install <STUNET_BINARY_DIR> --prefix <WORK_DIR>/prefix,
#                        then find_package(stunet) with CMAKE_PREFIX_PATH=<prefix>;
#   2. add_subdirectory: the consumer adds <STUNET_SOURCE_DIR> as a subproject.
# Run by the ctest entry `package_consumer` (tests/CMakeLists.txt):
#   cmake -DSTUNET_SOURCE_DIR=... -DSTUNET_BINARY_DIR=... -DWORK_DIR=... -DGENERATOR=...
#         [-DMAKE_PROGRAM=...] [-DCXX_COMPILER=...] [-DBUILD_TYPE=...] -P TestPackageConsumer.cmake
# Any failing step stops the script with FATAL_ERROR (so the test fails) and
# shows the command and its complete output.
cmake_minimum_required(VERSION 3.25)

foreach(var STUNET_SOURCE_DIR STUNET_BINARY_DIR WORK_DIR GENERATOR)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "TestPackageConsumer.cmake: -D${var}=... is required")
  endif()
endforeach()
if(NOT BUILD_TYPE)
  set(BUILD_TYPE Release)
endif()

set(consumer_source "${STUNET_SOURCE_DIR}/tests/consumer")
set(prefix "${WORK_DIR}/prefix")

# Options shared by both consumer configures: same generator and compiler as
# the main build, ccache when available, no CUDA re-detection.
set(common_args -G "${GENERATOR}" -DCMAKE_BUILD_TYPE=${BUILD_TYPE} -DCMAKE_FIND_PACKAGE_NO_PACKAGE_REGISTRY=ON)
if(MAKE_PROGRAM)
  list(APPEND common_args "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
endif()
if(CXX_COMPILER)
  list(APPEND common_args "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}")
endif()
find_program(ccache_program ccache)
if(ccache_program)
  list(APPEND common_args "-DCMAKE_CXX_COMPILER_LAUNCHER=${ccache_program}")
endif()

# run_step(<description> <command>...): runs the command; on failure stops
# with the command line, its exit status and everything it printed.
function(run_step description)
  string(JOIN " " command_line ${ARGN})
  message(STATUS "${description}: ${command_line}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    # The output verbatim (message() without a mode does not re-wrap it), then the verdict.
    message("---- output of: ${command_line} ----\n${out}---- end of output ----")
    message(FATAL_ERROR "package_consumer: ${description} failed (exit status ${rc}): ${command_line}")
  endif()
  set(step_output "${out}" PARENT_SCOPE)
endfunction()

# run_consumer(<build dir>): runs the built program and shows what it printed.
function(run_consumer build_dir)
  set(exe "${build_dir}/stunet_consumer")
  if(NOT EXISTS "${exe}" AND EXISTS "${build_dir}/${BUILD_TYPE}/stunet_consumer")
    set(exe "${build_dir}/${BUILD_TYPE}/stunet_consumer")  # multi-config generators
  endif()
  run_step("run the consumer" "${exe}")
  message(STATUS "consumer output:\n${step_output}")
endfunction()

file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")

# ---- 1. install + find_package -----------------------------------------------
run_step("install stunet" "${CMAKE_COMMAND}" --install "${STUNET_BINARY_DIR}" --prefix "${prefix}" --config ${BUILD_TYPE})
foreach(installed include/stunet/core/tensor.hpp include/stunet/ops/elementwise.hpp)
  if(NOT EXISTS "${prefix}/${installed}")
    message(FATAL_ERROR "package_consumer: the install did not produce ${prefix}/${installed}")
  endif()
endforeach()
file(GLOB_RECURSE config_files "${prefix}/*/stunetConfig.cmake")
if(NOT config_files)
  message(FATAL_ERROR "package_consumer: no stunetConfig.cmake under ${prefix}")
endif()

set(build_installed "${WORK_DIR}/find-package")
run_step("configure the consumer against the install" "${CMAKE_COMMAND}" -S "${consumer_source}" -B "${build_installed}"
         ${common_args} "-DCMAKE_PREFIX_PATH=${prefix}")
# The package must come from the prefix, not from the build tree or elsewhere.
file(STRINGS "${build_installed}/CMakeCache.txt" stunet_dir_line REGEX "^stunet_DIR:")
string(REGEX REPLACE "^stunet_DIR:[A-Z]+=" "" stunet_dir "${stunet_dir_line}")
file(REAL_PATH "${prefix}" real_prefix)
if(EXISTS "${stunet_dir}")
  file(REAL_PATH "${stunet_dir}" stunet_dir)
endif()
string(FIND "${stunet_dir}" "${real_prefix}/" at)
if(NOT at EQUAL 0)
  message(FATAL_ERROR "package_consumer: find_package(stunet) used '${stunet_dir}', not the install in ${prefix}")
endif()
run_step("build the consumer (find_package)" "${CMAKE_COMMAND}" --build "${build_installed}" --config ${BUILD_TYPE})
run_consumer("${build_installed}")

# ---- 2. add_subdirectory ---------------------------------------------------------
set(build_subdir "${WORK_DIR}/add-subdirectory")
run_step("configure the consumer with add_subdirectory" "${CMAKE_COMMAND}" -S "${consumer_source}" -B "${build_subdir}"
         ${common_args} "-DSTUNET_CONSUMER_SOURCE_DIR=${STUNET_SOURCE_DIR}" -DSTUNET_ENABLE_CUDA=OFF)
run_step("build the consumer (add_subdirectory)" "${CMAKE_COMMAND}" --build "${build_subdir}" --config ${BUILD_TYPE})
run_consumer("${build_subdir}")

message(STATUS "package_consumer: find_package and add_subdirectory consumers built and ran")
