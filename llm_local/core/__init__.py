"""Pure request logic: types, validation, prompts, detokenizing, stops, admission, state.

Nothing in here opens a socket or starts a thread; trio is used only for waiting.
"""
