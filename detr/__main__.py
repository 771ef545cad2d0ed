from detr.cli import run

run()
