"""Teaching: the graded exercises (`exercises`), nbgrader-style grading and assignments (`grading`), and what the
notebooks draw and tabulate (`viz`). It sits above everything it teaches, so it may import any room but the CLI."""
