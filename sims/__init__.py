"""Discrete-event simulations of the SpecEdge network, calibrated from `specedge bench`.

Modules:
    calibration  timings and acceptance taken from a bench JSON (or plausible CPU defaults)
    roofline     GPU calibrations from first principles (devices, model shapes, engines)
    paper        the SpecEdge paper's setting on simulated GPUs; CPU vs GPU pass costs
    network      the SimPy model: edge nodes, verifiers, and the two server-side baselines
    validation   simulated against measured, per mode and stream count; fake bench files
    scenarios    the scale sweeps (nodes, RTT, acceptance, verifier failures)
    plots        PNG figures of the sweeps

Run as `python -m sims validate|scale|paper|fake-bench|run` from the repository root.
"""
