#!/usr/bin/env python3
"""Prints a YAML file's documents as a JSON array (the deployment checks read it)."""
import json
import sys

import yaml

with open(sys.argv[1], encoding="utf-8") as source:
    json.dump(list(yaml.safe_load_all(source)), sys.stdout)
