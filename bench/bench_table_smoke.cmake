# ctest bench_table_smoke (cmake -P): runs the smallest layer benchmark for a
# few milliseconds with JSON output, then bench_table.py on the JSON. The
# test passes on the table's header row (PASS_REGULAR_EXPRESSION), which only
# appears when both steps ran, so a failing step stops here with an error.
#   -DBENCH=<stunet_bench_layers_cpu> -DPYTHON=<python3> -DSCRIPT=<bench_table.py> -DJSON=<output file>
foreach(var BENCH PYTHON SCRIPT JSON)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "bench_table_smoke.cmake: -D${var}=... is required")
  endif()
endforeach()

file(REMOVE ${JSON})  # a stale file from an earlier run must not make the test pass
execute_process(
  COMMAND ${BENCH} --benchmark_filter=^instance_norm_fwd/c32_e32 --benchmark_min_time=0.01
          --benchmark_out=${JSON} --benchmark_out_format=json
  RESULT_VARIABLE bench_rc)
if(NOT bench_rc EQUAL 0 OR NOT EXISTS ${JSON})
  message(FATAL_ERROR "benchmark failed (exit ${bench_rc}) or wrote no ${JSON}")
endif()

execute_process(COMMAND ${PYTHON} ${SCRIPT} ${JSON} RESULT_VARIABLE table_rc)
if(NOT table_rc EQUAL 0)
  message(FATAL_ERROR "bench_table.py failed (exit ${table_rc})")
endif()
