"""The ablation axes and their variants, in the order of the report; each variant is the YAML fragment
ablations/<axis>/<variant>.yaml. Read by run.py (the sweep) and report.py (the tables), which import it rather
than each other."""

AXES = {
    "dilation": ["none", "1", "1-3", "1-3-5", "1-3-5-7", "1-2-3", "1-3-5-k5"],
    "scan": ["row", "row_reversed", "column", "bidirectional", "cross"],
    "backend": ["torch", "triton", "fused"],
}
