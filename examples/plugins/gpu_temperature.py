"""Example collector plugin (the spec's GPU temperature monitor): per-GPU temperature through NVML.

Copy it into the plugin directory (``plugin_directory`` / ``vllm-otel receiver --plugin-dir``). Its
numbers appear on the receiver's /metrics as
``vllm_otel_plugin_value{plugin="gpu_temperature",key="gpu0_temperature_celsius"}`` and so on.
Settings (``initialize``): ``temp_threshold`` in Celsius (default 80). On a host without a GPU it
reports ``gpu_count`` 0 and ``status`` "no GPU" instead of failing.
"""

from __future__ import annotations

from typing import Any, Mapping

from vllm_otel.plugins import PluginInterface


class GPUTemperatureMonitor(PluginInterface):
    name = "gpu_temperature"
    plugin_type = "collector"

    def initialize(self, config: Mapping[str, Any]) -> None:
        self.threshold = float(config.get("temp_threshold", 80))
        self.nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
        except Exception:  # noqa: BLE001 - no driver or no GPU: report that, do not fail
            self.nvml = None

    def execute(self) -> dict[str, Any]:
        if self.nvml is None:
            return {"status": "no GPU", "gpu_count": 0}
        nv = self.nvml
        out: dict[str, Any] = {"gpu_count": nv.nvmlDeviceGetCount(), "status": "ok"}
        hot = 0
        for i in range(out["gpu_count"]):
            temp = nv.nvmlDeviceGetTemperature(nv.nvmlDeviceGetHandleByIndex(i), nv.NVML_TEMPERATURE_GPU)
            out[f"gpu{i}_temperature_celsius"] = temp
            hot += temp > self.threshold
        out["gpus_over_threshold"] = hot
        if hot:
            out["status"] = "warning"
            out["message"] = "GPU running hot"
        return out

    def shutdown(self) -> None:
        if self.nvml is not None:
            try:
                self.nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass
