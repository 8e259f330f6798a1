/*
 * offline: `luamilter test SCRIPT MESSAGE.eml... [options]` plays the
 * messages through the daemon's own session and Lua bridge and prints, for
 * each, its stages' verdicts and the message as Postfix would deliver it.
 */
#ifndef LUAMILTER_OFFLINE_H
#define LUAMILTER_OFFLINE_H

#include "sess.h"

/*
 * argv[0] is "test". base supplies on_error and max_body. Returns the exit
 * status, the worst of the messages': 0 delivered, 1 refused or
 * discarded, 2 usage or script error.
 */
int offline_main(int argc, char **argv, const struct sess_cfg *base);

#endif
