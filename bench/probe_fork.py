"""Which of the fork server's imports leave torch unable to use CUDA in a forked child (torch's
'bad fork'), with and without PYTORCH_NVML_BASED_CUDA_CHECK. Run on a GPU machine."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if "--nvml" in sys.argv:
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"


def child_state() -> str:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        import torch
        try:
            bad = torch._C._cuda_isInBadFork()
            ok = (torch.ones(2, device="cuda") * 2).sum().item() == 4 if not bad else False
            os.write(w, f"bad_fork={bad} cuda_works={ok}".encode())
        except Exception as err:
            os.write(w, f"error {err}"[:200].encode())
        os._exit(0)
    os.close(w)
    out = os.read(r, 300).decode()
    os.waitpid(pid, 0)
    return out


import torch  # noqa: E402

print("after import torch:", child_state(), "initialized", torch.cuda.is_initialized(), flush=True)
from turbowan.forkserver import import_each, os_threads  # noqa: E402

for spec in import_each():
    print(f"after {spec}:", child_state(), "threads", os_threads(), "initialized", torch.cuda.is_initialized(), flush=True)
print("is_available:", torch.cuda.is_available(), child_state())
