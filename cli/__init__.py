"""The `flywheel` command line: on top of flywheel/, flows/, judges/ and storage/."""
