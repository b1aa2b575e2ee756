"""Stand-in for Transformer Lab's plugin_harness.py (app v0.30.x), used by the lifecycle tests.

What the real harness does, and so what this does: parse --plugin_dir (every other argument is left
in sys.argv for the plugin), append the plugin folder to sys.path, `import main`, and call
`main.main()` if it exists. The return value is ignored: only an exception or sys.exit sets the
exit status. The app starts it with the plugin venv's python and cwd = the app's own folder.
"""
import argparse
import sys

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--plugin_dir", required=True)
    known, _rest = ap.parse_known_args()
    sys.path.append(known.plugin_dir)
    import main  # noqa: E402  (the plugin's main.py)

    if callable(getattr(main, "main", None)):
        main.main()
