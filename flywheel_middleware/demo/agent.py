"""The demo's support agent: a LangChain chain of a retriever, a prompt and a scripted model.

The model is a small ``BaseChatModel`` whose answer quality depends on its config the way a
real one's does: a high temperature makes it improvise (wrong answers), a small retrieval
``top_k`` often misses the right document, and a system prompt that says to answer only from
the context makes it escalate instead of guessing. Everything is seeded, so a run repeats.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Any

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnableLambda


@dataclass(frozen=True)
class Article:
    id: str
    topic: str
    keyword: str
    answer: str


KNOWLEDGE_BASE = [
    Article(
        "kb-refund",
        "billing",
        "refund",
        "Refunds go back to the original card within 5 business days of approval.",
    ),
    Article(
        "kb-invoice",
        "billing",
        "invoice",
        "Invoices are under Account → Billing → Invoices, as PDF.",
    ),
    Article(
        "kb-charge",
        "billing",
        "charged twice",
        "A double charge is a pending authorisation; it drops off within 48 hours.",
    ),
    Article(
        "kb-ship",
        "shipping",
        "shipping",
        "Standard shipping takes 3–5 business days; express takes 1–2.",
    ),
    Article(
        "kb-track",
        "shipping",
        "track",
        "Track a parcel from Orders → Track, or with the link in the confirmation email.",
    ),
    Article(
        "kb-address",
        "shipping",
        "address",
        "The delivery address can be changed until the order is packed.",
    ),
    Article(
        "kb-password",
        "account",
        "password",
        "Reset the password from the sign-in page with 'Forgot password'.",
    ),
    Article(
        "kb-2fa", "account", "two-factor", "Two-factor authentication is under Account → Security."
    ),
    Article(
        "kb-delete",
        "account",
        "delete my account",
        "Account deletion is under Account → Privacy and takes 30 days.",
    ),
    Article(
        "kb-return",
        "returns",
        "return",
        "Items can be returned within 30 days with the prepaid label.",
    ),
    Article(
        "kb-exchange",
        "returns",
        "exchange",
        "Exchanges for another size are free; start one from Orders.",
    ),
    Article(
        "kb-damaged",
        "returns",
        "damaged",
        "Send a photo of a damaged item and we ship a replacement at no cost.",
    ),
]
BY_ID = {a.id: a for a in KNOWLEDGE_BASE}
PHRASINGS = [
    "Hi, quick question about {k}: how does it work?",
    "I need help with {k}.",
    "Can you tell me about {k} please?",
    "What is your policy on {k}?",
    "{k} — what should I do?",
]
STRICT_MARKER = "only from the context"
HANDOVER_ANSWER = "I'm not certain about that one, so I'm passing you to a colleague who can check."
_DOC = re.compile(r"\[(kb-[a-z0-9-]+)\]")
# where the right article lands in the retriever's ranking (rank 1..5)
RANK_WEIGHTS = [0.35, 0.35, 0.15, 0.10, 0.05]


def _rng(*parts: Any) -> random.Random:
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def question_for(article: Article, variant: int) -> str:
    return PHRASINGS[variant % len(PHRASINGS)].format(k=article.keyword)


def article_for(question: str) -> Article | None:
    text = question.lower()
    for a in sorted(KNOWLEDGE_BASE, key=lambda a: -len(a.keyword)):
        if a.keyword in text:
            return a
    return None


class ScriptedRetriever(BaseRetriever):
    """A retriever whose ranking puts the right article at rank 1 only 35% of the time."""

    top_k: int = 3
    seed: str = "0"

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        rng = _rng("retrieve", self.seed, query)
        right = article_for(query)
        others = [a for a in KNOWLEDGE_BASE if a is not right]
        rng.shuffle(others)
        ranking = others[:]
        if right is not None:
            rank = rng.choices(range(len(RANK_WEIGHTS)), weights=RANK_WEIGHTS)[0]
            ranking.insert(rank, right)
        return [
            Document(page_content=f"[{a.id}] {a.answer}", metadata={"id": a.id})
            for a in ranking[: self.top_k]
        ]


class ScriptedSupportModel(BaseChatModel):
    """A chat model whose answers get worse with temperature and better with a strict prompt."""

    temperature: float = 0.7
    seed: str = "0"
    model_name: str = "scripted-support-1"

    @property
    def _llm_type(self) -> str:
        return "scripted-support"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "temperature": self.temperature}

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: Any = None,
        **kwargs: Any,
    ) -> ChatResult:
        system = " ".join(str(m.content) for m in messages if m.type == "system")
        human = str(messages[-1].content)
        question = human.rsplit("Question:", 1)[-1].strip()
        right = article_for(question)
        in_context = right is not None and right.id in _DOC.findall(human)
        strict = STRICT_MARKER in system.lower()
        rng = _rng("answer", self.seed, question, self.temperature, strict)
        improvise = 0.04 + 0.45 * max(0.0, self.temperature) ** 1.5
        if strict:
            improvise /= 2
        if in_context and rng.random() >= improvise:
            text = right.answer
        elif strict and not in_context:
            text = HANDOVER_ANSWER
        else:
            wrong = rng.choice([a for a in KNOWLEDGE_BASE if a is not right])
            text = wrong.answer  # a confident answer about something else
        words = len(human.split()) + len(system.split())
        message = AIMessage(
            content=text,
            usage_metadata={
                "input_tokens": words,
                "output_tokens": len(text.split()),
                "total_tokens": words + len(text.split()),
            },
        )
        return ChatResult(generations=[ChatGeneration(message=message)])


class ScriptedRewriter(BaseChatModel):
    """The demo's prompt rewriter (offline stand-in for an LLM doing APO).

    It reads the bad cases it is shown and, when users complain about wrong answers, adds an
    instruction to answer only from the context; placeholders are kept.
    """

    model_name: str = "scripted-rewriter-1"

    @property
    def _llm_type(self) -> str:
        return "scripted-rewriter"

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> ChatResult:
        text = str(messages[-1].content)
        match = re.search(r"<<<\n(.*?)\n>>>", text, re.S)
        template = match.group(1) if match else ""
        if "wrong" in text.lower() and STRICT_MARKER not in template.lower():
            template = (
                template.rstrip()
                + " Answer only from the context below; if it does not contain the answer, "
                "say so and hand the customer to a colleague instead of guessing."
            )
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=template))])


def _format_docs(docs: list[Document]) -> str:
    return "\n".join(d.page_content for d in docs)


def build_chain(config: dict[str, Any], seed: str) -> Runnable:
    """The support chain for one request's resolved config."""
    retriever = ScriptedRetriever(top_k=int(config["rag"]["top_k"]), seed=seed)
    prompt = ChatPromptTemplate.from_messages(
        [
            ("system", config["prompts"]["system"]),
            ("human", "Context:\n{context}\n\nQuestion: {question}"),
        ]
    )
    model = ScriptedSupportModel(temperature=float(config["llm"]["temperature"]), seed=seed)
    return (
        {
            "context": RunnableLambda(lambda x: x["question"]) | retriever | _format_docs,
            "question": RunnableLambda(lambda x: x["question"]),
            "company": RunnableLambda(lambda x: x.get("company", "our shop")),
        }
        | prompt
        | model
        | StrOutputParser()
    ).with_config(run_name="support_agent")


# -- the regression gate's runner and judge (YAML evaluation:) ----------------------------

REGRESSION_SEED = "regression"
"""One seed for every config the gate compares, so they see the same retrieval draws."""


def run(config: dict[str, Any], input: Any) -> str:
    """The gate's runner: the support chain under ``config`` answers one recorded input
    (the question, or a mapping with ``question``), without recording a rollout."""
    question = input.get("question") if isinstance(input, dict) else input
    chain = build_chain(config, seed=REGRESSION_SEED)
    return chain.invoke({"question": str(question), "company": "Acme Shop"})


def grade(sample: Any) -> float:
    """The gate's judge (a ``rule`` callable): 1 for the knowledge base's answer, 0.5 for an
    honest hand-over to a colleague, 0 for a confident answer about something else."""
    right = article_for(sample.prompt_text)
    answer = sample.response_text.strip()
    if right is not None and answer == right.answer:
        return 1.0
    return 0.5 if answer == HANDOVER_ANSWER else 0.0
