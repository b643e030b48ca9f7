"""Where spotguard hears of the world: the poll, the SQS queue, and the event format they share."""
