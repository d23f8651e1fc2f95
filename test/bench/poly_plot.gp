# Plots bench_poly's CSV: where the polynomial method beats exact attention (left) and
# what it costs in accuracy (right). Usage:
#   gnuplot -e "csv='lib/bench/poly.csv'; out='docs/backends.png'" test/bench/poly_plot.gp
if (!exists("csv")) csv = 'lib/bench/poly.csv'
if (!exists("out")) out = 'lib/bench/poly.png'
set terminal pngcairo size 1400,560 font ",11"
set output out
set datafile separator ","
set multiplot layout 1,2 title "liblora: POLY (polynomial method) vs EXACT attention, forward+backward, one head, 2 threads"

set title "Speed-up of POLY over EXACT at R = 0.5 (above 1: POLY wins)"
set logscale xy
set xlabel "sequence length L"
set ylabel "exact time / poly time"
set key top left
set grid
f(x) = 1
# awk keeps one series' rows together, so gnuplot joins its points.
sel(d, g, cond) = sprintf("< awk -F, '$4==\"poly\" && $1==%s && $5==%s && %s' %s", d, g, cond, csv)
plot for [d in "8 16 32 64"] for [g in "2 4"] \
     sel(d, g, "$3==0.5 && $8>0") using 2:8 with linespoints title sprintf("d=%s g=%s", d, g), \
     f(x) with lines dt 2 lc rgb "black" title "break-even"

set title "Measured relative error of dL/dQ rows (sampled, L = 1024)"
set logscale xy
set xlabel "score bound R = max|S_ij - c_i|"
set ylabel "max |dq~ - dq| / max |dq|"
set key top left
plot for [d in "8 16 32 64"] for [g in "2 4"] \
     sel(d, g, "$2==1024 && $11>0") using 3:11 with linespoints title sprintf("d=%s g=%s", d, g)
unset multiplot
