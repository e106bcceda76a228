# The two commands of the README. Everything they need is installed by scripts/setup.
.PHONY: demo test setup

# Sets up, then runs a small campaign end to end on the embedded PostgreSQL cluster.
demo: setup
	cargo run --release --quiet -p sortie_mcp --bin sortie-runner -- demo

# Sets up, then runs every test.
test:
	scripts/test

setup:
	scripts/setup
