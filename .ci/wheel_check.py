"""`make wheel-check`: the wheel holds the library (typed, metrics package, demo task) and no lab code."""

import glob
import sys
import zipfile

wheel = glob.glob(f"{sys.argv[1]}/guidewrap-*.whl")[0]
names = zipfile.ZipFile(wheel).namelist()
required = ("guidewrap/__init__.py", "guidewrap/py.typed", "guidewrap/metrics/__init__.py", "guidewrap/tasks.py")
missing = [f for f in required if f not in names]
# Studies, the paper's other tasks, references and benchmarks live in examples/, tests/ and bench/.
lab_dirs = ("guidewrap/experiments/", "examples/", "tests/", "bench/")
lab = [n for n in names if n.startswith(lab_dirs) or "reference" in n]
if missing or lab:
    sys.exit(f"wheel lacks {missing}" if missing else f"wheel ships lab code: {lab}")
print("wheel ok:", len(names), "files, no lab code")
