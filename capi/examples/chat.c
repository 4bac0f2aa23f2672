/* wick from C: load a model with a progress callback, stream a reply, print its summary.
 *
 *   cargo build -p wick-c
 *   cc capi/examples/chat.c -Icapi/include -Ltarget/debug -lwick_c -o chat
 *   LD_LIBRARY_PATH=target/debug ./chat MODEL ["prompt"]
 */
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "wick.h"

static void on_progress(const char *stage, uint64_t done, uint64_t total, void *user) {
    (void)user;
    if (done == total) {
        fprintf(stderr, "[%s] %llu/%llu\n", stage, (unsigned long long)done,
                (unsigned long long)total);
    }
}

struct stream {
    size_t pieces;
    size_t bytes;
};

static bool on_token(const char *content, const char *reasoning, void *user) {
    struct stream *s = user;
    (void)reasoning;
    fputs(content, stdout);
    fflush(stdout);
    s->pieces++;
    s->bytes += strlen(content);
    return true;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL [PROMPT]\n", argv[0]);
        return 2;
    }
    const char *prompt = argc > 2 ? argv[2] : "Hello! Who are you?";
    fprintf(stderr, "wick %s\n", wick_version());

    WickLoadOptions load = wick_load_options_default();
    load.max_model_len = 2048;
    WickModel *model = NULL;
    char *error = NULL;
    if (wick_load(argv[1], &load, on_progress, NULL, &model, &error) != WICK_STATUS_OK) {
        fprintf(stderr, "load failed: %s\n", error);
        wick_string_free(error);
        return 1;
    }

    /* The messages as JSON; a real app would escape the prompt. */
    char messages[4096];
    snprintf(messages, sizeof messages, "[{\"role\": \"user\", \"content\": \"%s\"}]", prompt);
    WickChatOptions chat = wick_chat_options_default();
    chat.enable_thinking = false;
    chat.max_tokens = 24;
    chat.temperature = 0.0f;
    struct stream s = {0, 0};
    char *reply = NULL;
    WickStatus status = wick_chat(model, messages, &chat, on_token, &s, &reply, &error);
    printf("\n");
    if (status != WICK_STATUS_OK) {
        fprintf(stderr, "chat failed (%d): %s\n", (int)status, error ? error : "");
        wick_string_free(error);
        wick_free(model);
        return 1;
    }
    printf("%s\n", reply);
    fprintf(stderr, "%zu pieces, %zu bytes streamed\n", s.pieces, s.bytes);
    wick_string_free(reply);

    /* A bad argument is an error code and a message, not a crash. */
    status = wick_chat(model, "not json", &chat, NULL, NULL, NULL, &error);
    if (status != WICK_STATUS_INVALID_ARGUMENT || error == NULL) {
        fprintf(stderr, "expected INVALID_ARGUMENT for bad JSON\n");
        return 1;
    }
    fprintf(stderr, "bad JSON: %s\n", error);
    wick_string_free(error);

    wick_free(model);
    return 0;
}
