#!/usr/bin/env python3
"""Sample application shipped in the app layer: prints its configuration."""
import sys

try:
    import yaml
except ImportError:  # the sample needs nothing beyond the standard library to run
    yaml = None


def main(path: str = "/opt/app/config.yaml") -> int:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if yaml is not None:
        print(yaml.safe_load(text))
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
