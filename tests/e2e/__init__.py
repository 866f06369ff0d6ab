"""End-to-end tests: the real ``twistd tcprelay`` and real Go services as subprocesses."""
