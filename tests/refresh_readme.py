"""Rewrite the config reference in README.md from the config's own field docs (python tests/refresh_readme.py)."""

import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- config-reference", "<!-- /config-reference -->"

text = README.read_text()
table = subprocess.run([sys.executable, "-m", "shardinfer.cli", "config-reference"], capture_output=True,
                       text=True, check=True).stdout.strip()
head = text.index("\n", text.index(START)) + 1
README.write_text(text[:head] + table + "\n" + text[text.index(END):])
