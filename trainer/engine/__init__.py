"""The training loop and what it is made of: the Task a job hands over, the train state, job start-up and closing."""
