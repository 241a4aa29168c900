"""nbgrader's configuration for the exercise notebooks: one assignment per exercise set.

``make exercises`` (or ``cd exercises && nbgrader generate_assignment <set> --no-db --force``) turns each source
notebook, with its solutions between ``### BEGIN SOLUTION`` and ``### END SOLUTION``, into the student copy under
``release/<set>/``: solutions replaced by ``raise NotImplementedError()``, outputs cleared, instructions and checks
locked. No gradebook database is used (``--no-db``).
"""

c = get_config()  # noqa: F821 (nbgrader's config loader defines it)
c.CourseDirectory.source_directory = "source"
c.CourseDirectory.release_directory = "release"
c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
