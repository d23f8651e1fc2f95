# `make calibrate`: times EXACT and POLY forward+backward on the calibration grid
# (test/bench/bench_poly.c --calibrate) and rewrites src/backend/poly_calibration.h, the
# rate ratios AUTO weighs POLY's flops with (docs/backends.md). Run it on a quiet
# machine, rebuild, and commit the header. Included by the Makefile.
CALIBRATION_HEADER := src/backend/poly_calibration.h
CALIBRATE_THREADS ?= 2

.PHONY: calibrate calibrate-run
calibrate: deps
	@$(MAKE) --no-print-directory calibrate-run
calibrate-run: lib/bench/bench_poly
	lib/bench/bench_poly --calibrate $(CALIBRATION_HEADER) --threads $(CALIBRATE_THREADS) \
	    --csv lib/bench/calibrate.csv
