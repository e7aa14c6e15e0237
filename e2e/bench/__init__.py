"""The benchmark harness: kvswitch side by side with its peers on one simulated fleet, one workload, one client.

Modules: workloads (Mooncake-format traces), tokenizer (the BPE tokenizer aiperf and the sim share),
peersenv (where the peers' commands live), routers (uniform launchers), fleet (the simulated fleet as a
subprocess), client (aiperf runs and their exports), runner (the comparison loop), report (markdown +
plots), cli (`kvswitch bench`).
"""
