"""Which dK/dV configurations give a wrong dK on test_backward_head_dims_gpu's case (GPU).

Run on a GPU from the repo root: ``PYTHONPATH=src python benchmarks/checks/dkdv_wrong_config.py``.
Session 3 (H200, Triton 3.6, fp16): Q-major pointer loads with 32-token Q tiles, 128-token KV
tiles and d=128 gave dK relative errors of 4.5e-2 (2 stages) and 6.0e-2 (3 stages); every
other row 2.9e-4 to 3.0e-4. ``gna.triton_backward.refused_dkdv`` refuses that configuration.
"""
import sys, torch
sys.path.insert(0, "tests")
import test_triton_backward as t
from gna.triton_backward import KernelConfig
orig = t.backward_configs
for kvm, tma, stages, qt, kt, d in [(False, False, 3, (1, 4, 8), (2, 8, 8), 128),
                                    (False, False, 2, (1, 4, 8), (2, 8, 8), 128),
                                    (False, True, 3, (1, 4, 8), (2, 8, 8), 128),
                                    (False, False, 3, (1, 8, 8), (2, 8, 8), 128),
                                    (False, False, 3, (1, 4, 8), (2, 4, 8), 128),
                                    (False, False, 3, (1, 4, 8), (2, 8, 8), 64),
                                    (True, True, 3, (1, 4, 8), (2, 8, 8), 128),
                                    (True, True, 3, (1, 4, 8), (2, 8, 8), 96)]:
    def forced(*a, **k):
        dq, _ = orig(*a, **k)
        return dq, KernelConfig(qt, kt, 8, stages, kv_major=kvm, use_tma=tma)
    t.backward_configs = forced
    case = t._case(shape=(12, 20, 24), kernel_size=(5, 7, 9), stride=(2, 3, 4),
                   dilation=(1, 2, 1), is_causal=(True, False, False), heads=4, heads_kv=2,
                   head_dim=d, extra=77, q_tile=(2, 8, 8), kv_tile=(2, 4, 8), batch=2,
                   fused=True)
    try:
        e = t._errors(case, torch.float16)
        print(f"kv_major={kvm} tma={tma} stages={stages} q={qt} kv={kt} d={d}:",
              {n: f"{v[0]:.1e}" for n, v in e.items()}, flush=True)
    except Exception as ex:
        print("error", kvm, tma, stages, qt, kt, d, repr(ex)[:200], flush=True)
