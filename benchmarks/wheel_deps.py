"""Checks the wheelhouse that travels to the air-gapped GPU machine (benchmarks/gpu_wheels.sh, gpu_check.sh).

    python benchmarks/wheel_deps.py closure .whl --python-version 3.12   # where the wheels are made
    python benchmarks/wheel_deps.py installed .whl                       # on the GPU machine, after the install

closure:   no wheel of torch / triton / nvidia-* (the machine's own CUDA stack must stay), one version per package,
           and every requirement of every wheel met by another wheel of the folder or by a package the GPU machine
           has preinstalled (benchmarks/gpu_preinstalled.txt; checked against its version where that file gives one).
installed: every requirement of every wheel met by what the running interpreter imports (importlib.metadata, so
           the `--target` folder first on PYTHONPATH counts), with versions: the machine's versions are only known
           there. Prints one line per unmet requirement; exit status 1 if any.
"""
import argparse
import importlib.metadata
import re
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

FORBIDDEN = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*)$")  # the machine's own stack
PREINSTALLED = Path(__file__).with_name("gpu_preinstalled.txt")


def wheels(folder: Path) -> dict[str, tuple[Version, Path]]:
    """canonical name -> (version, path) of each wheel in the folder; SystemExit on two versions of one package."""
    found: dict[str, tuple[Version, Path]] = {}
    for path in sorted(folder.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(path.name)
        if name in found:
            raise SystemExit(f"{folder}: two wheels of {name} ({found[name][1].name}, {path.name}): keep one")
        found[name] = (version, path)
    return found


def requirements(path: Path, python_version: str) -> list[Requirement]:
    """The wheel's Requires-Dist that apply without extras on the given Python (markers evaluated)."""
    with zipfile.ZipFile(path) as wheel:
        meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        lines = wheel.read(meta).decode().splitlines()
    env = {"python_version": python_version, "python_full_version": python_version + ".0", "extra": "",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    reqs = [Requirement(line.split(":", 1)[1].strip()) for line in lines if line.startswith("Requires-Dist:")]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(env)]


def preinstalled(path: Path = PREINSTALLED) -> dict[str, Version | None]:
    """canonical name -> version (None where unknown) of the GPU machine's packages, from `name[==version]` lines."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[canonicalize_name(name)] = Version(version) if version else None
    return out


def closure(folder: Path, python_version: str) -> list[str]:
    """Problems of the wheelhouse as one line each (empty: it is complete and leaves the machine's stack alone)."""
    have, machine = wheels(folder), preinstalled()
    problems = [f"{have[n][1].name}: the GPU machine's own {n} must not be replaced" for n in have if FORBIDDEN.match(n)]
    for name, (_, path) in have.items():
        for req in requirements(path, python_version):
            dep = canonicalize_name(req.name)
            if dep in have:
                ok, where = req.specifier.contains(have[dep][0], prereleases=True), f"wheel {have[dep][0]}"
            elif dep in machine:
                version = machine[dep]
                ok = version is None or req.specifier.contains(version, prereleases=True)
                where = f"preinstalled {version or '(version checked there)'}"
            else:
                ok, where = False, "neither a wheel here nor preinstalled"
            if not ok:
                problems.append(f"{name} needs {req}: {where}")
    return problems


def installed(folder: Path) -> list[str]:
    """Unmet requirements of the wheelhouse's packages in the running interpreter, one line each."""
    problems = []
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for name, (_, path) in wheels(folder).items():
        for req in requirements(path, version):
            try:
                got = importlib.metadata.version(req.name)
            except importlib.metadata.PackageNotFoundError:
                problems.append(f"{name} needs {req}: not installed")
                continue
            if not req.specifier.contains(got, prereleases=True):
                problems.append(f"{name} needs {req}: found {got}")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["closure", "installed"])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--python-version", default="3.12", help="closure: the GPU machine's Python (markers)")
    args = ap.parse_args(argv)
    if not any(args.folder.glob("*.whl")):
        raise SystemExit(f"{args.folder}: no wheels (run benchmarks/gpu_wheels.sh)")
    problems = closure(args.folder, args.python_version) if args.what == "closure" else installed(args.folder)
    for line in problems:
        print(f"wheelhouse: {line}")
    print(f"wheelhouse {args.what}: {'OK' if not problems else f'{len(problems)} problem(s)'} "
          f"({len(wheels(args.folder))} wheels in {args.folder})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
