"""Files for the tools people watch GPUs with: a Grafana dashboard (`grafana`) over the
metrics a worker serves (`/metrics`) and its emulated dcgm-exporter (`--dcgm-port`), and
a PromQL reader (`promql`) that lists the metric names an expression uses."""
