"""TensorBoard scalars and memory readings (process RSS/VMS via psutil, GPU allocated/reserved)."""

from __future__ import annotations

from pathlib import Path

import psutil
import torch


class Telemetry:
    """Writes every numeric value it is given as a TensorBoard scalar (when ``tb_dir`` is set)."""

    def __init__(self, tb_dir: str | Path | None, device: torch.device):
        self.device = device
        self.proc = psutil.Process()
        self.writer = None
        if tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(tb_dir))

    def memory(self) -> dict:
        mem = self.proc.memory_info()
        out = {"cpu_rss_gib": mem.rss / 2**30, "cpu_vms_gib": mem.vms / 2**30}
        if self.device.type == "cuda":
            out["gpu_allocated_gib"] = torch.cuda.memory_allocated(self.device) / 2**30
            out["gpu_reserved_gib"] = torch.cuda.memory_reserved(self.device) / 2**30
            out["gpu_peak_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return out

    def scalars(self, values: dict, step: int) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("fold", "step", "total_steps"):
                self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
