"""The README's configuration table is the one the code defines."""
import os
import re

from flashserve.server.config import config_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_config_table_is_current():
    text = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"<!-- config-table:start -->\n(.*)\n<!-- config-table:end -->", text, re.S)
    assert block, "README.md lost its config-table markers"
    assert block.group(1) == config_table(), "README config table is stale: regenerate it from config_table()"
