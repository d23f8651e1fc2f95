#!/bin/sh
# Runs examples/mpi/train_mpi under mpirun with 2 ranks (and 3: uneven shards) and
# checks that the data-parallel parameters equal the single-process run (the program
# compares them itself and exits non-zero otherwise). Used by `make check-mpi`.
# Usage: sh examples/mpi/run_test.sh [path/to/train_mpi]
set -eu
bin=${1:-lib/examples/mpi/train_mpi}
as_root=""
[ "$(id -u)" -eq 0 ] && as_root="--allow-run-as-root"
# No CMA single-copy (needs ptrace rights some containers withhold); local transports only.
export OMPI_MCA_btl_vader_single_copy_mechanism=none
export OMPI_MCA_btl=self,vader
status=0
for np in 2 3; do
    echo "== mpirun -np $np --oversubscribe $as_root $bin"
    if ! timeout 120 mpirun -np "$np" --oversubscribe $as_root "$bin"; then
        echo "check-mpi: FAILED with $np ranks"
        status=1
    fi
done
[ "$status" -eq 0 ] && echo "check-mpi: data-parallel = single-process with 2 and 3 ranks"
exit "$status"
