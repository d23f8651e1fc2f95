# Mutation testing (docs/reliability.md, "Mutation testing"), included by the Makefile.
# Not part of check or CI: each mutant rebuilds the library in a scratch copy of the tree
# and runs the C suites (minutes to an hour).
#   make mutate                  every mutant of test/mutation/mutants.txt, score, survivors
#   make mutate MUTANTS=a,b      only these ids
#   make mutate-anchors          only check that every mutant's snippet still matches once
MUTATE_PY ?= python3
MUTATE_JOBS ?= 2
MUTANTS ?=
.PHONY: mutate mutate-anchors
mutate:
	$(MUTATE_PY) test/mutation/mutate.py --jobs $(MUTATE_JOBS) $(if $(MUTANTS),--only $(MUTANTS))
mutate-anchors:
	$(MUTATE_PY) test/mutation/mutate.py --anchors
