"""The live dashboard: workers' `/metrics` polled, shown side by side in a browser.

`memorywall dashboard` points it at workers (their HTTP fronts or metrics ports) or a
fleet's ready file and serves the page on a port of its own; `serve --dashboard` serves it
under `/dashboard/` of a worker's HTTP front, reading that worker's metrics in-process;
`memorywall demo --dashboard` opens it on the demo's servers.

    scrape   one /metrics body, parsed (prometheus_client's parser)
    derive   a column's figures from two scrapes: rates, recent quantiles, gauges
    sources  the workers: targets from URLs or a fleet's ready file, HTTP and local reads
    poller   scrapes every interval, keeps the window and the sparklines' history
    web      the aiohttp application: the page, its assets, /api/snapshot
    site     the application on a port of its own, in a loop or a thread

The page is plain HTML, JavaScript and CSS in `static/` (package data, no build step).
It imports no grpc: only aiohttp and prometheus_client, like the CLI's other light paths.
"""
