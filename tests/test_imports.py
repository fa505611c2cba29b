"""The import floors, read from the source with `ast` (nothing is imported).

Console scripts sit on the top floor: `jip2p.cli` may import any library module, and no library
module may import `jip2p.cli` (nor anything under it), at module level or inside a function.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "jip2p"


def imported_modules(path: pathlib.Path) -> set[str]:
  """Every absolute module name ``path`` imports, with ``from a import b`` giving ``a.b``."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names.add(node.module)
      names.update(f"{node.module}.{alias.name}" for alias in node.names)
  return names


def test_the_reader_sees_each_import_form(tmp_path):
  path = tmp_path / "m.py"
  path.write_text("import jip2p.cli.edit\nfrom jip2p import cli\n"
                  "def f():\n  from jip2p.cli import run\n")
  assert {"jip2p.cli.edit", "jip2p.cli", "jip2p.cli.run"} <= imported_modules(path)


def test_no_library_module_imports_the_console_scripts():
  library = [p for p in ROOT.rglob("*.py") if ROOT / "cli" not in p.parents]
  assert len(library) > 50
  offenders = {str(p.relative_to(ROOT.parent)): sorted(upward)
               for p in library
               if (upward := {m for m in imported_modules(p)
                              if m == "jip2p.cli" or m.startswith("jip2p.cli.")})}
  assert not offenders, f"library modules import jip2p.cli: {offenders}"
