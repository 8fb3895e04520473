"""`/openapi.json` against a real OpenAPI 3.1 validator.

Usage: check_openapi.py URL   (prints the paths and methods, one per line; exits non-zero if invalid)
"""
import json
import sys
import urllib.request

from openapi_spec_validator import validate
from openapi_spec_validator.versions import consts  # noqa: F401 - the 3.1 validator is the default for "3.1.0"


def main(url):
    with urllib.request.urlopen(url) as r:
        doc = json.load(r)
    assert doc["openapi"].startswith("3.1"), doc["openapi"]
    validate(doc)
    for path, ops in sorted(doc["paths"].items()):
        for method in ops:
            print(f"{method.upper()} {path}")


if __name__ == "__main__":
    main(sys.argv[1])
