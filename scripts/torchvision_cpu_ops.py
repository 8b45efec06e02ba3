"""Start-up hook for CPU-only machines whose torchvision wheel is a CUDA build.

Such a torchvision cannot load its compiled ops beside CPU torch and fails on import with
``operator torchvision::nms does not exist``. Declaring the two op schemas before torchvision's
first import lets its pure-Python part (transforms, models, everything timm uses) work.
scripts/setup.sh installs this hook only where a plain ``import torchvision`` fails; it waits for
torchvision's first import so other programs do not pay for importing torch.
"""
import importlib.abc
import sys


class _DeclareTorchvisionOps(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        sys.modules["_torchvision_cpu_ops_lib"] = lib  # the definitions live as long as the library object
        return None


sys.meta_path.insert(0, _DeclareTorchvisionOps())
