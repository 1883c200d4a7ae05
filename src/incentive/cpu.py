"""What /proc/cpuinfo says of this CPU: its vendors and feature flags, for choices made by CPU kind."""

from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def cpuinfo_values(key: str, cpuinfo: Path = CPUINFO) -> list[str]:
    """The values of every ``key : value`` line (one per logical CPU); none where the file cannot be read."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return []
    fields = (line.partition(":") for line in text.splitlines())
    return [value.strip() for name, colon, value in fields if colon and name.strip() == key]


def cpu_vendors(cpuinfo: Path = CPUINFO) -> set[str]:
    """``vendor_id`` of every logical CPU (AuthenticAMD, GenuineIntel, ...)."""
    return set(cpuinfo_values("vendor_id", cpuinfo))


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str]:
    """Feature flags any logical CPU lists (avx512f, avx512_bf16, amx_bf16, ...)."""
    return {flag for line in cpuinfo_values("flags", cpuinfo) for flag in line.split()}
