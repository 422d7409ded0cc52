# Renders BENCHMARKS.md's scale plot from the bench's TSV:
#   SCALE_BENCH_TSV=target/scale.tsv cargo bench -p server-side --bench scale
#   gnuplot -e "tsv='target/scale.tsv'; png='server-side/benches/scale.png'" server-side/benches/scale_plot.gnuplot
# Columns: server, n, connected, reach_s, rss_before_kib, rss_at_n_kib, kib_per_tunnel, idle_cpu_pct.
if (!exists("tsv")) tsv = 'target/scale.tsv'
if (!exists("png")) png = 'server-side/benches/scale.png'
set datafile separator "\t"
set terminal pngcairo size 1200,450 font ",10" noenhanced
set output png
set multiplot layout 1,2 title "tunnel-server vs Go remotedialer: N idle TLS agent tunnels on one 2-core machine (shared, noisy)"
set key top left
set grid
set xlabel "N (agent tunnels)"
set xrange [0:*]
set yrange [0:*]
# One server's rows each (a filtered column would leave gaps that break the lines).
ours = "< grep '^tunnel-server' ".tsv
go = "< grep '^Go remotedialer' ".tsv
set ylabel "server RSS with N idle tunnels, MiB"
plot ours using 2:($6/1024) with linespoints lw 2 pt 7 title "tunnel-server (Rust)", \
     go using 2:($6/1024) with linespoints lw 2 pt 5 title "Go remotedialer (gopeer)"
set ylabel "time to reach N connected, s"
plot ours using 2:4 with linespoints lw 2 pt 7 title "tunnel-server (Rust)", \
     go using 2:4 with linespoints lw 2 pt 5 title "Go remotedialer (gopeer)"
unset multiplot
