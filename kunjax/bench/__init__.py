"""`kunjax bench`: open-loop replay of a workload against serving policies, with per-request metrics.

`command.py` (flags and the order of a run), `replay.py` (the clock: scheduler, timeline sampler, progress),
`targets.py` (an engine in this process, or a server over gRPC), `metrics.py` (definitions of queue, TTFT,
TPOT, e2e, SLO attainment, goodput, throughput), `report.py` (CSVs, plots, the table). Workloads come from
`kunjax.workloads`.
"""
