"""Write a scratch project's pytest.ini from pyproject.toml's pytest settings (addopts, markers).

Used by the mutation scripts: mutmut 3 reads its own configuration from setup.cfg, so the scratch
project gets pytest's settings without the packaging sections.  Usage: pytest_ini.py PYPROJECT OUT
"""

import sys
import tomllib

opts = tomllib.load(open(sys.argv[1], "rb"))["tool"]["pytest"]["ini_options"]
with open(sys.argv[2], "w") as f:
    f.write("[pytest]\n")
    f.write("addopts = %s\n" % opts.get("addopts", ""))
    f.write("markers =\n" + "".join("    %s\n" % m for m in opts.get("markers", [])))
