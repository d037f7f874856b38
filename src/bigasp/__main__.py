from bigasp.cli import run

run()
