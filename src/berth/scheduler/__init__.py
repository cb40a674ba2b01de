"""berth.scheduler: Marathon API subset and the local process driver."""
