"""The fake plugin's platform: vLLM's CPU platform, reporting a device name of its own.

It keeps the CPU platform's enum (``is_cpu()`` stays true), so every CPU code
path of vLLM runs unchanged and an honest run is bitwise the CPU reference;
only the device name and the worker class differ. A real plugin (vllm-rbln's
``RblnPlatform``) may report ``device_type == "cpu"`` too, which is why the
harness identifies a plugin's platform by its entry point, not its device type.
"""

from __future__ import annotations

from vllm.platforms.cpu import CpuPlatform

WORKER = "vre_fake_plugin.worker.VreFakeWorker"


class VreFakePlatform(CpuPlatform):
    device_name: str = "vre_fake"

    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        # as a real plugin does, the platform names its own worker; set before the CPU platform would pick its own
        if vllm_config.parallel_config.worker_cls == "auto":
            vllm_config.parallel_config.worker_cls = WORKER
        super().check_and_update_config(vllm_config)
