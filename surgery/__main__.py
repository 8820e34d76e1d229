from surgery.cli import run

run()
