"""File recognition shared by the file dialects (SaluteSpeech async, connecte predictions):
decode per channel, VAD, recognize through the scheduler, durable jobs."""
