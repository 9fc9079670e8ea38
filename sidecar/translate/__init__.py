"""Translation between the client-facing APIs and the chat completions API the offload engine speaks.

In offload mode the upstream is the reference engine, which only implements ``/v1/chat/completions``.
Clients may still call ``/v1/messages`` (Anthropic), ``/v1/responses`` (OpenAI Responses) or
``/v1/completions`` (OpenAI legacy completions); this package owns the payload-level mapping both ways,
and nothing else (no I/O, no HTTP statuses):

* requests (:mod:`.requests`): :func:`messages_to_chat` and :func:`responses_to_chat` build a chat request,
  raising :class:`TranslationError` (naming the field) for anything chat cannot express;
* non-streaming answers (:mod:`.answers`): :func:`chat_to_messages` and :func:`chat_to_responses` turn a
  ``chat.completion`` (as :func:`sidecar.assemble.assembler_for` re-assembles it) into the client API's object;
* streams (:mod:`.streams`): :func:`chat_stream_to_messages` and :func:`chat_stream_to_responses` return a
  :class:`StreamTranslator` fed the engine's parsed chat SSE events one by one; it answers with encoded
  SSE frames in the client API's own event grammar.

* legacy completions (:mod:`.completions`), all three directions in one module: :func:`completions_to_chat`,
  :func:`chat_to_completions` and :func:`chat_stream_to_completions`.

:mod:`.common` holds the mapping of chat answer fields (ids, usage, stop reasons, the Responses object)
that whole answers and streams share.
"""

from .answers import chat_to_messages, chat_to_responses
from .completions import chat_stream_to_completions, chat_to_completions, completions_to_chat
from .requests import TranslationError, messages_to_chat, responses_to_chat
from .streams import StreamTranslator, chat_stream_to_messages, chat_stream_to_responses

__all__ = [
    "StreamTranslator",
    "TranslationError",
    "chat_stream_to_completions",
    "chat_stream_to_messages",
    "chat_stream_to_responses",
    "chat_to_completions",
    "chat_to_messages",
    "chat_to_responses",
    "completions_to_chat",
    "messages_to_chat",
    "responses_to_chat",
]
